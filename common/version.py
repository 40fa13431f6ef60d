"""The release this code is: agents report it, `--version` prints it."""

VERSION = "0.1.0"
