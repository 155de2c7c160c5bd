"""``python -m meshkit``: the ``meshkit`` command line."""

from .cli import main

if __name__ == "__main__":
    main()
