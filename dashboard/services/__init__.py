"""The dashboard's only way into the engine: shared engines, cached results, per-session state.

Three kinds of state, kept apart on purpose:

- **Shared, read-only engines** (``st.cache_resource``): datasets and fitted
  :class:`~core.explainer.Explainer` objects. An explainer is built by a
  :class:`~dashboard.services.background.Preparation`, a background thread that any number of
  sessions can watch; the cache holds the preparation, so a second user arriving during the first
  build sees the same progress instead of starting another.
- **Shared, content-keyed results** (``st.cache_data`` with ``max_entries``): explanations,
  heatmaps and experiments, keyed by the frozen settings themselves
  (:class:`~dashboard.services.settings.Settings`, its
  :class:`~dashboard.services.settings.EngineSpec`, core's frozen configs) and the query's content
  (a test index, or the sha256 of an uploaded image's decoded pixels), never by anything that
  identifies a session or a user.
- **Per-session state** (``st.session_state``): the settings chosen in the sidebar, the selected
  test image or upload, the training image being inspected, and the results this session asked
  for. Keys used here start with ``state_``; widget keys carry their page's prefix (``side_``,
  ``explain_``, ...).

One module per concern:

- :mod:`.settings`: the sidebar's :class:`~.settings.Settings`, dataset and backbone choices.
- :mod:`.engines`: the shared explainer's preparation, and domain errors as messages.
- :mod:`.background`: preparations in background threads, bounded, shared, abandoned unwatched.
- :mod:`.cluster`: where the server computes (``$INFLUENCE_CLUSTER``), for the sidebar.
- :mod:`.preparing`: what a large choice costs before it starts, progress and Cancel.
- :mod:`.facts`: what pages read of a prepared explainer (sizes, names, images, predictions).
- :mod:`.query`: what is being explained (a test image or an upload), and the gallery.
- :mod:`.uploads`: decoding an uploaded file, safely.
- :mod:`.your_data`: an uploaded dataset (zip) and network, owned by the session or its link.
- :mod:`.explanations`: explanations, heatmaps, the models compared, verification.
- :mod:`.experiments`: the Training data pages' groups, data cleaning and attack.
- :mod:`.trust`: the Trust page's fragility study and live runs.
- :mod:`.runs`: "run once, remember for this session", shared by every experiment.
- :mod:`.widgets`: widget values that survive a visit to another page.

Pages and components import these modules, never ``core``; a page calls
:func:`~.engines.require_explainer` and :func:`~.query.current_query`, then hands the explainer
back to the functions here rather than reading its attributes. Models are a collection: every
function loops over the explainer's models and none names one.
"""

from __future__ import annotations

from core.errors import InfluenceExplorerError

__all__ = ["InfluenceExplorerError"]
