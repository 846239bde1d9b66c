"""The application: settings, metrics, logging, and the `Service` that wires every layer and owns shutdown.

Nothing is imported here (the layers below name `app.metrics` and `app.settings`): import the modules.
"""
