"""enginekit's version, from the installed distribution (no import of the build-time side)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("enginekit")
except PackageNotFoundError:  # running from a source tree that was not pip-installed
    __version__ = "0+unknown"
