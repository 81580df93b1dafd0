"""Influence Explorer's engine: data, features, convex models, influence, verification.

The dashboard imports this package; this package never imports the dashboard or Streamlit.
"""

__version__ = "0.1.0"
