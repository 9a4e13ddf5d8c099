"""`python -m tinystory` runs the CLI (also what `torchrun -m tinystory train` starts)."""

from tinystory.cli.app import main

if __name__ == "__main__":
    main()
