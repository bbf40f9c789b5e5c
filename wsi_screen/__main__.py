"""``python -m wsi_screen`` runs the command line."""

from wsi_screen.cli.main import main

if __name__ == "__main__":
    main()
