"""Cluster consensus on etcd: agreed config, membership and backend health.

``store`` is the only module that knows the etcd client; ``keys`` draws the
key layout; ``agree``, ``semaphore`` and ``document`` are pure decisions;
``members`` writes a node's own keys; ``push`` is the config history that
``anycast-lb cluster`` drives. The layout and the rules: docs/consensus.md.
"""
