"""A synthetic local corpus for GPU runs (the GPU machine has no internet):

    python3 bench/synthetic_corpus.py DIR

240 documents of ~4,000 random words (Zipf-weighted over 2,000 made-up words), ~6 MB of text,
the same every time (seed 0). Train on it with the byte tokenizer.
"""

import random
import sys
from pathlib import Path

root = Path(sys.argv[1])
root.mkdir(parents=True)
rng = random.Random(0)
letters = "etaoinshrdlucmfwypvbgkjqxz"
words = ["".join(rng.choice(letters[:12 + i % 14]) for _ in range(rng.randint(2, 9))) for i in range(2000)]
weights = [1.0 / (r + 1) for r in range(len(words))]
for d in range(240):
    (root / f"doc{d:03d}.txt").write_text(" ".join(rng.choices(words, weights, k=4000)) + ".\n")
print(f"corpus: {sum(p.stat().st_size for p in root.iterdir()) / 1e6:.1f} MB in {root}")
