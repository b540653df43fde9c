"""``kafkaworkers ui``: a web console for the installed plugins and the cluster they run on.

The pages live in :mod:`kafkaworkers.ui.app`; this package imports nothing from the web
stack itself, so the command can say how to install it when it is missing.
"""
