"""The substitute ID metric on the synthetic data itself: how far apart does dlib's face
descriptor put two renders of one synthetic identity, against two different identities?

    python experiments/id_reference.py [--num=40] [--resolution=256]

Draws `num` synthetic identities (texture and FLAME shape, as the embedded dataset draws them),
renders each under two random expression/pose/camera sets at `resolution`² (the ID protocol's
pairs, `evaluate.py --metrics=id`), aligns the faces by the template head's own landmarks
(`--id_alignment=model`) and prints JSON: the mean descriptor distance within identities and
between identity i's first and identity i+1's second render. A generated head can keep its
identity no better than this reference, so the demo's ID (README, "Evaluation") reads against it.
"""
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402
from reta3d import cli  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    """Flags are defined only when run as a script, so tests can import `id_reference`."""
    flags.DEFINE_integer("num", 40, "Synthetic identities.")
    flags.DEFINE_integer("resolution", 256, "Render size (the ID protocol's --face_resolution).")
    flags.DEFINE_integer("seed", 0, "Seed of identities and conditions.")


def id_reference(num: int, resolution: int, seed: int = 0) -> dict:
    import numpy as np

    from reta3d import binding as binding_lib
    from reta3d import flame as flame_lib
    from reta3d import synthetic
    from reta3d.evaluation import face_embedding, protocol
    from reta3d.fitting import embedding as embedding_lib

    model = flame_lib.load()
    hb = binding_lib.HeadBinding.from_model(model, 128, 32)
    rng = np.random.default_rng(seed)
    colours = synthetic.random_textures(rng, synthetic.texel_geometry(model, hb), model, num)
    sets = [synthetic.random_flame(rng, model, num) for _ in range(2)]
    sets[1]["shape"] = sets[0]["shape"]   # one identity: its shape and texture stay
    embed = face_embedding.dlib_descriptor_fn(min_score=0.0)
    emb_model = embedding_lib.template_embedding()
    descriptors = []
    for flame in sets:
        cameras = synthetic.random_cameras(rng, num).astype(np.float32)
        images = np.concatenate([synthetic.render_heads(colours[s:s + 8],
                                                        {k: v[s:s + 8] for k, v in flame.items()},
                                                        cameras[s:s + 8], resolution)
                                 for s in range(0, num, 8)])
        marks = protocol.model_landmarks(model, emb_model, dict(flame, camera=cameras),
                                         resolution)
        descriptors.append(embed(images, landmarks68=marks)[0])
    a, b = descriptors
    return {"num": num, "resolution": resolution,
            "metric": "dlib ResNet face descriptor distance (faces aligned by the head "
                      "model's own landmarks)",
            "same_identity": float(np.mean(np.linalg.norm(a - b, axis=1))),
            "other_identities": float(np.mean(np.linalg.norm(a - np.roll(b, 1, 0), axis=1)))}


def main(argv):
    del argv
    print(json.dumps(id_reference(FLAGS.num, FLAGS.resolution, FLAGS.seed), indent=1))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
