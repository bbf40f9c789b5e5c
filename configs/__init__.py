"""YAML presets shipped with wsi-screen (installed as the ``wsi_screen.configs`` package)."""
