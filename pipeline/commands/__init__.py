"""The `metacompress` commands: the top layer. One module per sub-command (see docs/design.md, "Layers")."""
