"""Development tools: the local KRaft broker launcher, the simulated fleet and the demo.

Why a package of its own: none of it may run in production, and the container image does not
install it. The service's processing path never imports from here.
"""
