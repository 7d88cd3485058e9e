"""The package's version, defined here only: the build reads it into the wheel's metadata
(pyproject.toml, [tool.scikit-build.metadata.version]), `blob2gpu.__version__` and
`blob2gpu --version` import it, and CHANGELOG.md has a section for it."""

__version__ = "0.1.0"
