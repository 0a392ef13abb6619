"""The application: the command line, presets, run folders, the warm-up curriculum and the
results file, above ``engines/``. ``run.py`` calls ``imaml.app.cli.main``; nothing outside this
package imports it, and the rest of ``imaml/`` (the library) imports neither ``engines``,
``envs`` nor the application (``tests/test_layout.py`` reads the imports)."""
