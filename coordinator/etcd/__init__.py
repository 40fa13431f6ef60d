"""`EtcdConsensus`: the `Consensus` interface on an existing etcd v3 cluster (issue 18).

Import `lepton.coordinator.etcd.consensus` only in etcd mode: it loads the etcd client
(aetcd's generated stubs). `lepton.coordinator.etcd.tls` is cheap.
"""
