"""The trace contract both sides share: stdlib, numpy and h5py only.

- :mod:`.format`: names, versions, validation, sanitising of what a trace holds;
- :mod:`.files`: the one atomic write, fsync, bounded JSON reading;
- :mod:`.shards`: the shard reader/writer interface, the in-memory implementation, the reader pool;
- :mod:`.hdf5`: the HDF5 implementation;
- :mod:`.series`: writing one rank's series of shards;
- :mod:`.captures`: attention and feature capture files, both directions;
- :mod:`.plans`: the pruning-plan format.

Nothing here imports the rest of the analyzer, pandas, matplotlib, seaborn, scipy, click or torch
(tests/test_architecture.py).
"""
