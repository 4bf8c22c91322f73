"""Remote sites: other organisations' clusters or machines, reached only through the training's store.

``relay`` is the coordinator's side (post each site's task, read its answers); ``participation``,
``policy`` and ``agent`` are the site's side (what it joins, what it accepts, what it does next),
shared by ``fedtrain site run`` and the site operator.
"""
