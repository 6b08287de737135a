"""Studies built on the library, kept apart from its core (as open_clip keeps its training app apart): score
ensembles with dev-chosen weights (``studies.ensemble``) and WiSE-FT weight interpolation (``studies.wise``).
They use models, embeddings and metrics; nothing in the core imports them."""
