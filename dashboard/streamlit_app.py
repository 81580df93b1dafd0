"""Influence Explorer dashboard entry point (placeholder until the Explain page lands)."""

import streamlit as st

st.set_page_config(page_title="Influence Explorer", layout="wide")
st.title("Influence Explorer")
st.write("The dashboard is being built; the engine lives in `core/`.")
