"""Command-line interface (click); the library never imports this package."""
