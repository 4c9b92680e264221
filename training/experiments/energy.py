"""`EnergyLandscapeAnalyzer`: PNG plots of the energy [UNI-1] around equilibria (matplotlib, imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

__all__ = ["EnergyLandscapeAnalyzer"]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # the dev extra carries matplotlib
        raise ImportError("EnergyLandscapeAnalyzer needs matplotlib: pip install matplotlib") from exc
    return plt


class EnergyLandscapeAnalyzer:
    """Energy E(z; c) of one token on 2-D slices, solver trajectories, and basins of attraction.

    `z_equilibrium` and `context` are (D,) or any (…, D) whose first row is used; plots go to `out_dir`.
    """

    def __init__(self, model: nn.Module, out_dir: str | Path = "energy_plots", *, resolution: int = 41,
                 seed: int = 0) -> None:
        self.model, self.out_dir, self.resolution, self.seed = model, Path(out_dir), resolution, seed
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def _plane(self, z: Tensor) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        a, b = torch.randn(2, z.numel(), generator=g).to(z)
        a = a / a.norm()
        b = b - (b @ a) * a
        return a, b / b.norm()

    def _default(self) -> tuple[Tensor, Tensor]:
        cfg: Any = cast(Any, self.model).config
        ids = torch.randint(0, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(self.seed))
        with torch.no_grad():
            _, d = self.model(ids.to(next(self.model.parameters()).device), return_diagnostics=True)
        return d["z_equilibrium"][0, -1], d["context"][0, -1]

    @torch.no_grad()
    def energy_grid(self, z_equilibrium: Tensor, context: Tensor, radius: float = 2.0) -> tuple[Tensor, Tensor]:
        """E on a resolution² grid of z* + s·a + t·b, s, t ∈ [−radius, radius]; returns (coords (R,), E (R, R))."""
        z, c = z_equilibrium.reshape(-1, z_equilibrium.shape[-1])[0], context.reshape(-1, context.shape[-1])[0]
        a, b = self._plane(z)
        s = torch.linspace(-radius, radius, self.resolution, dtype=z.dtype, device=z.device)
        pts = z + s[:, None, None] * a + s[None, :, None] * b  # (R, R, D)
        maps = self.model.step_maps(c.expand(pts.shape[0] * pts.shape[1], -1))  # type: ignore[operator]
        return s, maps.energy(pts.reshape(-1, z.numel())).reshape(self.resolution, self.resolution)

    def visualize_2d_slice(self, z_equilibrium: Tensor | None = None, context: Tensor | None = None,
                           radius: float = 2.0, filename: str = "energy_slice.png") -> Path:
        if z_equilibrium is None or context is None:
            z_equilibrium, context = self._default()
        s, E = self.energy_grid(z_equilibrium, context, radius)
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(5, 4))
        im = ax.contourf(s.cpu().numpy(), s.cpu().numpy(), E.T.float().cpu().numpy(), levels=30)
        ax.plot([0], [0], "r*", markersize=12, label="z*")
        ax.set_xlabel("direction a")
        ax.set_ylabel("direction b")
        ax.set_title("Energy E(z; c) on a 2-D slice through z*")
        ax.legend()
        fig.colorbar(im)
        path = self.out_dir / filename
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return path

    @torch.no_grad()
    def trajectories(self, context: Tensor, n_trajectories: int = 8, steps: int = 20) -> Tensor:
        """Energies (n, steps + 1) along the solver map from random initial states."""
        c = context.reshape(-1, context.shape[-1])[0]
        g = torch.Generator().manual_seed(self.seed)
        z = torch.randn(n_trajectories, c.numel(), generator=g).to(c) * 2.0
        maps = self.model.step_maps(c.expand(n_trajectories, -1))  # type: ignore[operator]
        T = maps.final_map(self.model.solver.solver_type)  # type: ignore[union-attr]
        out = [maps.energy(z)]
        for _ in range(steps):
            z = T(z)
            out.append(maps.energy(z))
        return torch.stack(out, 1)

    def visualize_convergence_trajectories(self, context: Tensor | None = None, n_trajectories: int = 8,
                                           steps: int = 20, filename: str = "convergence_trajectories.png") -> Path:
        if context is None:
            _, context = self._default()
        E = self.trajectories(context, n_trajectories, steps)
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(5, 4))
        for row in E.float().cpu().numpy():
            ax.plot(row, alpha=0.7)
        ax.set_xlabel("iteration")
        ax.set_ylabel("E(z_k; c)")
        ax.set_title("Energy along solver trajectories")
        path = self.out_dir / filename
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return path

    @torch.no_grad()
    def basin_grid(self, z_equilibrium: Tensor, context: Tensor, radius: float = 3.0, steps: int = 30) -> Tensor:
        """‖T^steps(z₀) − z*‖ for z₀ on the slice grid (R, R): small where z₀ lies in z*'s basin."""
        z, c = z_equilibrium.reshape(-1, z_equilibrium.shape[-1])[0], context.reshape(-1, context.shape[-1])[0]
        a, b = self._plane(z)
        s = torch.linspace(-radius, radius, self.resolution, dtype=z.dtype, device=z.device)
        pts = (z + s[:, None, None] * a + s[None, :, None] * b).reshape(-1, z.numel())
        maps = self.model.step_maps(c.expand(pts.shape[0], -1))  # type: ignore[operator]
        T = maps.final_map(self.model.solver.solver_type)  # type: ignore[union-attr]
        for _ in range(steps):
            pts = T(pts)
        return (pts - T(z[None].expand_as(pts))).norm(dim=-1).reshape(self.resolution, self.resolution)

    def visualize_basin_of_attraction(self, z_equilibrium: Tensor | None = None, context: Tensor | None = None,
                                      radius: float = 3.0, filename: str = "basin_of_attraction.png") -> Path:
        if z_equilibrium is None or context is None:
            z_equilibrium, context = self._default()
        dist = self.basin_grid(z_equilibrium, context, radius)
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(5, 4))
        im = ax.imshow(dist.T.float().cpu().numpy(), origin="lower", extent=(-radius, radius, -radius, radius))
        ax.set_title("Distance to z* after 30 solver steps")
        fig.colorbar(im)
        path = self.out_dir / filename
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return path
