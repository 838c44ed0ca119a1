"""What the tests and the benchmarks start and watch, in one place.

- :mod:`testbed.fake_upstream`: a fake OpenAI-compatible server (``FakeUpstream``), in a thread
  of the caller's process or on its own (``python -m testbed.fake_upstream``).
- :mod:`testbed.upstream_host`: the fake upstream in a process of its own, steered over
  stdin/stdout (``UpstreamHost`` starts it), so its CPU is not the caller's.
- :mod:`testbed.gateway`: the gateway served by Granian as ``scripts/serve`` serves it.
- :mod:`testbed.services`: a private ``redis-server`` and a throwaway PostgreSQL database, each
  to break on purpose (pause, refuse connections) and stop by its own handle.
- :mod:`testbed.samplers`: CPU and memory of processes and of the machine (``psutil``, the
  ``bench`` extra), and waiting for a quiet machine.

Nothing here imports the gateway's packages: it talks to the gateway over HTTP and its
command line only (an import-linter contract keeps it so).
"""
