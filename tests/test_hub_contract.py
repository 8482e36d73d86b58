"""MultiMax KerasHub models against KerasHub's own contract, at ts = 0.

KerasHub checks every model family with its ``TestCase``
(``keras_hub.src.tests.test_case``): ``run_backbone_test`` (config and
serialization round trips, eager and compiled calls, variable lengths, the
name, mixed precision, int8/float8 quantization) and ``run_task_test``
(preprocessing, predict and fit with and without a dataset, compilation).
Here the same helpers run on the MultiMax classes, with the default
modulator (ts = 0), as KerasHub's own tests run on the SoftMax ones. (The
helper module imports ``grain``: the ``test`` extra installs it.)
"""

import hub_models as H
import keras
import keras_hub
from keras_hub.src.tests.test_case import TestCase

from keras_multimax import hub

M = keras_hub.models


class MultiMaxBackboneContractTest(TestCase):
    """Two kinds of twin: MultiHeadAttention (BERT) and Softmax sublayer (Llama)."""

    def _run(self, name):
        cls, kwargs = H.BACKBONES[name]
        multimax = hub.multimax_class(cls)
        softmax = cls(**kwargs)
        x = H.inputs(softmax)
        self.run_backbone_test(
            cls=multimax,
            init_kwargs=kwargs,
            input_data=x,
            # The shapes of KerasHub's own SoftMax backbone.
            expected_output_shape=keras.tree.map_structure(
                lambda y: tuple(y.shape), softmax(x)
            ),
            # KerasHub's check wants every weight in the policy's variable
            # dtype; the modulators' ranges/ts are float32 under every policy
            # (`Modulator.add_weights`), so the check runs below with that
            # one exception.
            run_mixed_precision_check=False,
        )
        for policy in ("mixed_float16", "mixed_bfloat16", "bfloat16"):
            policy = keras.DTypePolicy(policy)
            model = multimax(**kwargs, dtype=policy)
            for y in keras.tree.flatten(model(x)):
                self.assertDTypeEqual(y, policy.compute_dtype)
            for weight in model.weights:
                expected = "float32" if weight.name in ("ranges", "ts") else None
                self.assertDTypeEqual(weight, expected or policy.variable_dtype)
            for layer in model._flatten_layers():
                if not isinstance(
                    layer, (keras.layers.Softmax, keras.layers.InputLayer)
                ):
                    self.assertEqual(layer.compute_dtype, policy.compute_dtype)

    def test_bert(self):
        self._run("bert")

    def test_llama(self):
        self._run("llama")


# A tiny byte-level BPE vocabulary.
GPT2_VOCABULARY = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate("abcdeĠ")}}
GPT2_VOCABULARY.update({"Ġa": 7, "ab": 8})
GPT2_MERGES = ["Ġ a", "a b"]


class MultiMaxTaskContractTest(TestCase):
    def test_gpt2_causal_lm(self):
        tokenizer = M.GPT2Tokenizer(vocabulary=GPT2_VOCABULARY, merges=GPT2_MERGES)
        backbone = hub.multimax_class(M.GPT2Backbone)(
            vocabulary_size=tokenizer.vocabulary_size(),
            num_layers=2,
            num_heads=2,
            hidden_dim=4,
            intermediate_dim=8,
            max_sequence_length=8,
        )
        self.run_task_test(
            cls=hub.multimax_class(M.GPT2CausalLM),
            init_kwargs={
                "preprocessor": M.GPT2CausalLMPreprocessor(
                    tokenizer, sequence_length=8
                ),
                "backbone": backbone,
            },
            train_data=(["ab ba cab", "cab ab"],),
            expected_output_shape=(2, 8, 9),
        )
