import sys

from . import main

if __name__ == "__main__":  # not when a worker process of `fmnist predict` imports this module again
    sys.exit(main())
