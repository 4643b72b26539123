"""Test setup: 8 fake CPU devices, so sharding is exercised for real on any machine; a persistent compilation cache.

XLA reads the device-count flag once, when jax is first imported, so it must be set here, before
any test module imports jax. The other settings are environment variables too, so the
subprocesses tests start (``jaxcpt train`` ...) inherit them.

Compilation cache: most of the suite's time is XLA compiling small CPU programs that are the
same from one run to the next. JAX's persistent cache keeps them outside the clone (CI clones
afresh each run; ``JAXCPT_TEST_CACHE`` moves it, ``JAXCPT_TEST_CACHE=off`` turns it off). Every
program is cached however quickly it compiled (min compile time 0), the directory is capped
in size (JAX evicts the least recently used entries). A cached program is the same program:
the key covers the HLO, the compile options, the backend and the jax/jaxlib versions.
"""

import os
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_cache = os.environ.get("JAXCPT_TEST_CACHE", str(Path.home() / ".cache" / "jaxcpt" / "jax-tests"))
if _cache != "off":
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 * 2**30))
