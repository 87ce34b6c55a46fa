"""flatlab.models: small models for the experiments, with activations as separate modules.

* :class:`MLP` (width, depth, activation) and :class:`ResidualMLP` (pre-LayerNorm blocks).
* :class:`MNISTCNN` (DomainBed's, GroupNorm), :class:`SmallCNN` (digits), :class:`CNN1d`
  (MNIST-1D), :class:`ResNet` (CIFAR-style, BatchNorm), :class:`ImageNetResNet` (ResNet-18/50,
  torchvision's parameter names; :func:`load_pretrained` reads an ImageNet checkpoint).
* :class:`ViT` and :class:`Mixer` (tiny, over image or MNIST-1D patches).
* :func:`build` makes any of them by name (for configs); :data:`MODELS` lists the names.

Every nonlinearity is its own ``nn.Module`` (from :func:`make_activation`: a name such as
``"relu"``/``"gelu"``/``"tanh"`` or a module class), so forward hooks find each one and
``flatlab.sparsity.sparsify`` can swap it.
"""

from flatlab.models.activations import ACTIVATIONS, make_activation
from flatlab.models.cnn import MNISTCNN, CNN1d, SmallCNN
from flatlab.models.imagenet_resnet import ImageNetResNet, load_pretrained
from flatlab.models.mixer import Mixer, MixerBlock, TokenMixing
from flatlab.models.mlp import MLP, MLPBlock, ResidualMLP
from flatlab.models.patches import Patchify
from flatlab.models.registry import MODELS, build
from flatlab.models.resnet import BasicBlock, ResNet
from flatlab.models.vit import SelfAttention, TransformerBlock, ViT

__all__ = [
    "ACTIVATIONS", "MLP", "MNISTCNN", "MODELS", "BasicBlock", "CNN1d", "ImageNetResNet",
    "MLPBlock", "Mixer", "MixerBlock", "Patchify", "ResNet", "ResidualMLP", "SelfAttention",
    "SmallCNN",
    "TokenMixing", "TransformerBlock", "ViT", "build", "load_pretrained", "make_activation",
]
