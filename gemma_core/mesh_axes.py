"""The names of the axes of a worker's device mesh, written once.

A worker lays its devices out as a 2-D mesh, data axis first, model axis
second. The layout maps put the weights' hidden axis on the data axis
(fully sharded data parallel) and heads and the feed-forward width on the
model axis; batches are split along the data axis. Everything that builds a
mesh, places weights on one or reports one names the axes from here.
"""

MESH_AXES = ("batch", "model")
DATA_AXIS, MODEL_AXIS = MESH_AXES
