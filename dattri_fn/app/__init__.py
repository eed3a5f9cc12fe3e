"""The application layer: per-task recipes, the demo and the ``dattri-fn`` command line."""
