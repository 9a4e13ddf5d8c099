"""The Typer CLI: thin modules mapping flags to settings and library calls."""
