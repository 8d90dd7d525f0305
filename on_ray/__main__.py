"""`python -m on_ray ...`: errors in what the command line names end in one line."""

import sys

from on_ray.cli import main

if __name__ == "__main__":
    from utils.base.errors import USER_ERRORS

    try:
        main(sys.argv[1:])
    except USER_ERRORS as err:
        sys.exit(f"on_ray: {err}")
