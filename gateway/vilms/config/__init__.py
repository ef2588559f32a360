"""The config wing: the schema, the typed model, validation and routing rules. Imports nothing from `deploy` or `serve`."""
