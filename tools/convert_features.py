"""Convert published STAGE features (I3D or SlowFast HDF5) into a feature store.

A thin CLI over :func:`stage_dist.convert.main`; run with ``--help`` for the options.
"""

import sys

from stage_dist.convert import main

if __name__ == "__main__":
    sys.exit(main())
