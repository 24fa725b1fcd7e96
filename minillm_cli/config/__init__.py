"""The recipe: its schema (`schema`) and how YAML files, overrides and flags become one (`loading`)."""
