"""minillm's shipped recipes, accelerate configs and built-in data: plain files at the repository's
top level (`recipes/`), installed as the resource package `minillm_cli.recipes` (a setuptools
`package-dir` mapping in pyproject.toml) so that an installed minillm finds them with
`importlib.resources`."""
