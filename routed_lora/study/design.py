"""The study's design, fixed before anything runs: the arms, the primary metric and the paired comparisons.

Constants only, shared by :mod:`.run` (which trains the arms and writes them to ``study.json``) and
:mod:`.report` (which tests the comparisons). Imports nothing from the study, so neither of those needs the
other to read them.
"""

from __future__ import annotations

ARMS = ("warm", "dart", "joint", "sft")
TRAINED = ("dart", "joint", "sft")
PRIMARY = {"metric": "held-out greedy EM, 2-hop questions", "comparison": ["dart", "joint"],
           "test": "paired bootstrap 95% interval of the per-question difference (means over seeds) and exact "
                   "McNemar pooled over (seed, question) pairs"}
COMPARISONS = (("dart", "joint"), ("dart", "sft"), ("joint", "sft"), ("dart", "warm"), ("joint", "warm"),
               ("sft", "warm"))
