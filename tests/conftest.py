"""Suite-wide settings: one Inductor cache folder for the run, CPU threads, deterministic seeds."""

import os
import tempfile

# One Inductor cache for the whole test session (CI sets its own; compiled blocks are shared).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "grapefx-test-inductor"))
