"""`python -m embedding`: the model and its inference have no job of their own; training moved to
its own package, so this only points there."""
import sys

if __name__ == "__main__":
    print("error: training moved: python -m training train --images PATH --out DIR [...] "
          "(see python -m training train --help)", file=sys.stderr)
    sys.exit(2)
