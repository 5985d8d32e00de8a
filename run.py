"""Hydra entry point of a checkout: ``python run.py <overrides>`` trains one run or a sweep.

The entry point itself is ``fourdfy.main.main`` (also the ``fourdfy-run`` console script of an installed
package); its docstring lists the common commands.
"""

from fourdfy.main import main

if __name__ == "__main__":
    main()
