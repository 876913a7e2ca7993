"""The model zoo: importing this package registers every family."""

from cnnjax.models import (  # noqa: F401
    alexnet,
    cifar_resnet,
    densenet,
    efficientnet,
    googlenet,
    mobilenet,
    resnet,
    vgg,
)
