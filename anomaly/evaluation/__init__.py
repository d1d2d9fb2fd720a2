"""Detection quality: the NAB and SKAB scorers, their dataset loaders, the benchmark runs and plots.

Why a package of its own: the service never needs it. ``serve`` and ``--help`` must not import it
(it pulls in pandas-heavy loaders, matplotlib and River); the CLI registers ``evaluate`` lazily.
No Kafka, no HTTP.
"""
