"""One benchmark definition per op (``bitfast.bench.harness.register``); ``bitfast.bench`` imports
every module of this folder."""
