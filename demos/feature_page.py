"""Write feature dashboards for a trained dictionary: an index of every feature and a page per
feature (histogram, top contexts, quantile samples, logit lens), read at the dictionary's recorded
site on held-out BBC News text (or --texts / --model as in the `features` command).

    python demos/feature_page.py runs/demo/dictionaries/trainer_10
    python demos/feature_page.py runs/demo/dictionaries/trainer_10 --features 113 7 --out pages

The same as `python -m dictionary_learning features ...` (see its --help).
"""

from __future__ import annotations

import sys

from dictionary_learning.cli import main

if __name__ == "__main__":
    main(["features", *sys.argv[1:]])
