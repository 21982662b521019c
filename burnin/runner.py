"""BurnInRunner: restore a stored state, burn in without gradient, then unroll under the caller's tape."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import keras
import numpy as np
import tensorflow as tf

from burnin._checks import check_int
from burnin.state import check_states, get_states, set_states, state_variables, stateful_layers

__all__ = ["BurnInRunner", "RunnerOutput"]

TensorState = tuple[tuple[tf.Tensor, ...], ...]


class RunnerOutput(NamedTuple):
    """What one burn-in pass returns. ``B`` is the model's fixed batch, ``T`` the window length."""

    outputs: Any
    """Model outputs on steps ``[burn_in, T)``, same structure as the model's output; each ``[B, T - burn_in, ...]``
    (``[B, 0, ...]`` when ``T == burn_in``). Only the first ``gradient_steps`` of them carry gradient."""
    burn_in_state: TensorState
    """Recurrent state before step ``burn_in`` (after the burn-in prefix)."""
    offset_states: tuple[TensorState, ...]
    """Recurrent state before step ``o``, for each ``o`` in ``runner.state_offsets``."""
    final_state: TensorState
    """Recurrent state after step ``T - 1``."""


class BurnInRunner:
    """Run a fixed-batch stateful Keras model over a window with an R2D2 burn-in.

    The stored state is restored, the first ``burn_in`` steps run without
    gradient, the next ``gradient_steps`` under the caller's tape, the tail
    (n-step targets) without gradient; ``state_offsets`` also returns the state
    before chosen steps. The full specification (timeline, masks, compilation,
    offsets) is in ``docs/runner.md``.

    Args:
        model: a Keras model (or a single layer) with fixed-batch stateful RNN layers.
        burn_in: number of leading steps run without gradient.
        gradient_steps: number of steps after the burn-in that the caller's tape
            records; the rest (the tail) runs without gradient. None: all of them.
        state_offsets: window positions at which to also return the state (for
            stored-state refresh and ΔQ). Each must be ``<= T`` at call time.
        jit_compile: compile with XLA. Results then match the eager ones only
            to about 1e-6 relative, not bitwise.
        allow_stateless: accept a model with no stateful RNN layer (states are then ``()``).
    """

    def __init__(
        self,
        model: keras.layers.Layer,
        *,
        burn_in: int,
        gradient_steps: int | None = None,
        state_offsets: Sequence[int] = (),
        jit_compile: bool = False,
        allow_stateless: bool = False,
    ) -> None:
        if not isinstance(model, keras.layers.Layer):
            raise TypeError(f"model: expected a keras.Model, got {type(model).__name__}")
        check_int("burn_in", burn_in, minimum=0)
        if isinstance(state_offsets, (str, bytes)) or not isinstance(state_offsets, Iterable):
            raise TypeError(
                f"state_offsets: expected a sequence of ints >= 0, got {type(state_offsets).__name__} "
                f"{state_offsets!r}"
            )
        offsets = [check_int("state_offsets", o, minimum=0) for o in state_offsets]
        if len(set(offsets)) != len(offsets):
            raise ValueError(f"state_offsets: expected distinct offsets, got {tuple(offsets)}")
        if gradient_steps is not None:
            check_int("gradient_steps", gradient_steps, minimum=1)
        self.gradient_steps = None if gradient_steps is None else int(gradient_steps)
        self.model = model
        self.burn_in = int(burn_in)
        self.state_offsets = tuple(offsets)
        try:
            self._layers = stateful_layers(model)
        except ValueError:
            if not allow_stateless:
                raise
            self._layers = []
        self._variables = [state_variables(layer) for layer in self._layers]
        batches = {int(v.shape[0]) for vs in self._variables for v in vs}
        if len(batches) > 1:
            raise ValueError(f"model: stateful layers have different batch sizes {sorted(batches)}")
        self.batch_size: int | None = batches.pop() if batches else None
        self._trace_count = 0
        self._masking_checked = False
        self._compiled = tf.function(self._traced, jit_compile=jit_compile, reduce_retracing=False)

    @property
    def trace_count(self) -> int:
        """How many times the compiled pass has been traced."""
        return self._trace_count

    # ------------------------------------------------------------------ public

    def __call__(self, inputs: Any, states: Any = None, *, mask: Any = None) -> RunnerOutput:
        """Run the window through the compiled pass; see the class docstring.

        Args:
            inputs: the model's input structure, each leaf ``[B, T, ...]``.
            states: a ``RecurrentState`` to restore before step 0, or None for zeros.
            mask: optional bool validity mask ``[B, T]``.
        """
        inputs, states, mask = self._prepare(inputs, states, mask)
        if not tf.executing_eagerly():
            return self._compiled(inputs, states, mask)
        # A call that fails puts the model's state back as it was (the pass writes it as it goes).
        saved = self._read()
        try:
            if mask is not None and not self._masking_checked:
                self.check_masking(inputs)
            return self._compiled(inputs, states, mask)
        except BaseException:
            self._write(saved)
            raise

    def run(self, inputs: Any, states: Any = None, *, mask: Any = None) -> RunnerOutput:
        """The same pass without compiling it; for use inside the caller's ``tf.function``."""
        return self._pass(inputs, states, mask)

    def check_masking(self, inputs: Any) -> None:
        """Check that a fully masked step leaves every stateful layer's state unchanged.

        Runs the model once on the first step of ``inputs`` with an all-False
        mask from a random state, then puts the previous state back. Raises
        ``ValueError`` if the state moved, which means some layer between the
        inputs and a stateful RNN drops the Keras mask.
        """
        if not self._layers:
            self._masking_checked = True
            return
        saved = get_states(self.model)
        rng = np.random.default_rng(0)
        probe_state = tuple(
            tuple(rng.standard_normal(a.shape).astype(a.dtype) for a in entry) for entry in saved
        )
        first = tf.nest.map_structure(lambda x: tf.convert_to_tensor(x)[:, :1], inputs)
        mask = tf.zeros((self.batch_size, 1), dtype=tf.bool)
        try:
            set_states(self.model, probe_state)
            self._call_model(first, mask)
            after = get_states(self.model)
        finally:
            # The model's own state goes back bit for bit, NaN included (no checks: it is not input).
            self._write(saved)
        for layer, before_entry, after_entry in zip(self._layers, probe_state, after):
            if not all(np.array_equal(b, a) for b, a in zip(before_entry, after_entry)):
                masking = [m.name for m in _masking_layers(self.model)]
                cause = (
                    f"keras.layers.Masking {masking} computes its own mask from the input values and "
                    "replaces the mask given here; remove it (the runner's mask marks the padded steps)"
                    if masking
                    else "some layer before it drops the Keras mask (give custom layers supports_masking = True)"
                )
                raise ValueError(
                    f"model {self.model.name!r}: a fully masked step changed the state of "
                    f"layer {layer.name!r}; {cause}"
                )
        self._masking_checked = True

    # ---------------------------------------------------------------- internal

    def _prepare(self, inputs: Any, states: Any, mask: Any) -> tuple[Any, Any, Any]:
        if inputs is None:
            raise TypeError(
                "inputs: expected an array or tensor [batch, time, ...] (or a structure of them), got None"
            )
        leaves = tf.nest.flatten(inputs)
        if not leaves:
            raise ValueError("inputs: expected at least one array")
        converted = []
        for i, x in enumerate(leaves):
            try:
                converted.append(tf.convert_to_tensor(x))
            except (TypeError, ValueError) as err:
                raise TypeError(
                    f"inputs[{i}]: expected an array or tensor [batch, time, ...], got {type(x).__name__} ({err})"
                ) from None
        batch = self.batch_size
        length = None
        for i, x in enumerate(converted):
            if x.shape.rank is None or x.shape.rank < 2:
                raise ValueError(f"inputs[{i}]: expected shape (batch, time, ...), got {tuple(x.shape)}")
            if batch is not None and x.shape[0] != batch:
                raise ValueError(
                    f"inputs[{i}]: expected batch {batch} (the model's fixed batch), got {x.shape[0]}"
                )
            if length is None:
                length = int(x.shape[1])
            elif x.shape[1] != length:
                raise ValueError(
                    f"inputs[{i}]: expected {length} time steps like inputs[0], got {x.shape[1]}"
                )
        needed = self.burn_in + (self.gradient_steps or 0)
        if needed > length or any(o > length for o in self.state_offsets):
            raise ValueError(
                f"inputs: {length} time steps is shorter than burn_in={self.burn_in} (+ gradient_steps="
                f"{self.gradient_steps}) or state_offsets={self.state_offsets}"
            )
        specs = getattr(self.model, "inputs", None)
        if specs and len(specs) == len(converted):
            for i, (x, spec) in enumerate(zip(converted, specs)):
                want = tuple(spec.shape)
                got = tuple(x.shape)
                if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want[2:], got[2:])):
                    raise ValueError(f"inputs[{i}]: expected shape {want} (batch, time, ...), got {got}")
        inputs = tf.nest.pack_sequence_as(inputs, converted)
        if mask is not None:
            mask = tf.convert_to_tensor(mask)
            if mask.dtype != tf.bool:
                raise TypeError(f"mask: expected dtype bool, got {mask.dtype.name}")
            want = (converted[0].shape[0], length)
            if tuple(mask.shape) != want:
                raise ValueError(f"mask: expected shape {want}, got {tuple(mask.shape)}")
        if states is not None:
            if not self._layers:
                states = None
            else:
                # Same checks (and error messages) as set_states, without writing.
                states = tuple(
                    tuple(tf.convert_to_tensor(a) for a in arrays)
                    for _, arrays in check_states(self.model, states)
                )
        return inputs, states, mask

    def _traced(self, inputs: Any, states: Any, mask: Any) -> RunnerOutput:
        self._trace_count += 1
        return self._pass(inputs, states, mask)

    def _read(self) -> TensorState:
        return tuple(tuple(tf.identity(v.value) for v in vs) for vs in self._variables)

    def _write(self, states: Any) -> None:
        for vs, entry in zip(self._variables, states):
            for v, value in zip(vs, entry):
                v.assign(value)

    def _zero(self) -> None:
        for vs in self._variables:
            for v in vs:
                v.assign(tf.zeros(v.shape, dtype=v.dtype))

    def _call_model(self, inputs: Any, mask: Any) -> Any:
        with warnings.catch_warnings():
            # Keras warns that the outer Model "destroys" the mask on its outputs;
            # we only need the mask inside, at the stateful layers.
            warnings.filterwarnings("ignore", message=".*does not support masking.*")
            if mask is None:
                return self.model(inputs, training=False)
            masks = tf.nest.map_structure(lambda _: mask, inputs)
            return self.model(inputs, mask=masks, training=False)

    def _segments(self, inputs: Any, mask: Any, cuts: list[int], *, gradient: bool, at: dict) -> list[Any]:
        """Run the model over consecutive segments between ``cuts``; record the state after each."""
        outputs = []
        for start, stop in itertools.pairwise(cuts):
            seg = tf.nest.map_structure(lambda x, a=start, b=stop: x[:, a:b], inputs)
            if not gradient:
                seg = tf.nest.map_structure(tf.stop_gradient, seg)
            out = self._call_model(seg, None if mask is None else mask[:, start:stop])
            outputs.append(out if gradient else tf.nest.map_structure(tf.stop_gradient, out))
            at[stop] = self._read()
        return outputs

    def _no_outputs(self, inputs: Any) -> Any:
        """The model's outputs over zero steps, each ``[B, 0, ...]`` (a window that is all burn-in).

        The model cannot run on zero steps (an RNN indexes its first step), so
        their shapes and dtypes come from Keras's symbolic output spec.
        """
        specs = tf.nest.map_structure(
            lambda x: keras.KerasTensor((x.shape[0], 0, *x.shape[2:]), dtype=x.dtype.name), inputs
        )
        spec = self.model.compute_output_spec(specs)
        return tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), spec)

    def _pass(self, inputs: Any, states: Any, mask: Any) -> RunnerOutput:
        length = int(tf.nest.flatten(inputs)[0].shape[1])
        burn_in = self.burn_in
        grad_end = length if self.gradient_steps is None else burn_in + self.gradient_steps
        if states is None:
            self._zero()
        else:
            self._write(states)
        # Step 0's state is read only when returned; every later one is recorded by _segments.
        at: dict[int, TensorState] = {0: self._read()} if 0 in (burn_in, *self.state_offsets) else {}
        offsets = self.state_offsets
        # Burn-in and tail may be cut anywhere: no gradient crosses them anyway.
        burn_cuts = sorted({0, burn_in, *(o for o in offsets if o < burn_in)})
        self._segments(inputs, mask, burn_cuts, gradient=False, at=at)
        outputs = (
            self._segments(inputs, mask, [burn_in, grad_end], gradient=True, at=at)
            if grad_end > burn_in
            else []
        )
        tail_cuts = sorted({grad_end, length, *(o for o in offsets if o > grad_end)})
        outputs += self._segments(inputs, mask, tail_cuts, gradient=False, at=at)
        final = at[length]
        inside = sorted(o for o in offsets if burn_in < o < grad_end)
        if inside:
            # A gradient-free replay of the unroll from the burned-in state, cut at the
            # requested offsets; then the final state goes back into the variables.
            self._write(at[burn_in])
            self._segments(inputs, mask, [burn_in, *inside], gradient=False, at=at)
            self._write(final)
        joined = (
            tf.nest.map_structure(lambda *xs: tf.concat(xs, axis=1), *outputs)
            if outputs
            else self._no_outputs(inputs)
        )
        return RunnerOutput(
            outputs=joined,
            burn_in_state=at[burn_in],
            offset_states=tuple(at[o] for o in offsets),
            final_state=final,
        )


def _masking_layers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """The ``keras.layers.Masking`` layers in ``layer`` (nested models searched), in order."""
    if isinstance(layer, keras.layers.Masking):
        return [layer]
    children = layer.layers if isinstance(layer, keras.Model) else []
    return [m for child in children for m in _masking_layers(child)]
