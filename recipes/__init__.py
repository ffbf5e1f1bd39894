"""The shipped recipes: this folder is installed as the package ``transferkit.recipes``."""
