"""The model zoo: one file per family; importing this package registers them all."""

from cnnlab.models import lenet, mlp, small_resnet  # noqa: F401  (registration)
