"""What several test files share: one thread for tiny models, and a small ImageFolder of demo
pictures with its pixel tokens."""

import os

import pytest
import torch
from PIL import Image

import data
import model
import tokenizer


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread than on several fighting for shared cores (seconds,
    not tenths, on a loaded machine). Used by a file's `pytestmark = usefixtures('one_thread')`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def make_demo_folder(tmp_path_factory):
    """make_demo_folder(train=N, val=M) -> (root, tokens): an ImageFolder of the first N train and
    M val demo pictures (32 px, in their class folders) and the pixel tokens of its train split
    (the micro ViT's patches and grid, vocabulary 16)."""
    micro = model.MODEL_CONFIGS['micro']
    patch, grid = micro['patch_size'], micro['img_size'] // micro['patch_size']

    def make(**images_per_split):
        root = tmp_path_factory.mktemp('images')
        for split, n in images_per_split.items():
            for i in range(n):
                image, label = data.render_demo_image(split, i)
                os.makedirs(root / split / data.DEMO_CLASSES[label], exist_ok=True)
                Image.fromarray(image).save(
                    root / split / data.DEMO_CLASSES[label] / f'{i:02d}.png'
                )
        tokens = str(root / 'tokens')
        tokenizer.main(
            [
                '--data',
                str(root),
                '--split',
                'train',
                '--features',
                'pixels',
                '--grid',
                str(grid),
                '--patch',
                str(patch),
                '--vocab',
                '16',
                '--sample',
                '1',
                '--out',
                tokens,
                '--device',
                'cpu',
            ]
        )
        return str(root), tokens

    return make
