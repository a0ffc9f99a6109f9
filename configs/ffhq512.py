"""The paper's model: 512^2 renders, 256^2 UV map, 64^2 mouth patch, batch 32, 25M images."""
from configs import default


def get_config():
    c = default.get_config()
    c.data.path = "data/ffhq512"
    c.render.resolution = 512
    return c
