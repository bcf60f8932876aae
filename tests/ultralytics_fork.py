"""A fork's own GAM class, as forks of ultralytics define it (positive666/yolo_research ``models/common.py``,
Chriz122/ultralytics_pro ``block.py``): plain torch, no gam_triton import, so a checkpoint holding it loads
where gam_triton is not installed. The tests put it into ``ultralytics.nn.tasks`` under ``GAM_Attention``, which
is what a fork's tasks.py does; parse_model then passes it the yaml's literal arguments."""
import torch
from torch import nn


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).contiguous().view(b, c, h, w)


class GAM_Attention(nn.Module):  # noqa: N801 - the fork's name
    def __init__(self, c1, c2, group=True, rate=4):
        super().__init__()
        self.channel_attention = nn.Sequential(
            nn.Linear(c1, int(c1 / rate)), nn.ReLU(inplace=True), nn.Linear(int(c1 / rate), c1))
        self.spatial_attention = nn.Sequential(
            nn.Conv2d(c1, c1 // rate, kernel_size=7, padding=3, groups=rate) if group else
            nn.Conv2d(c1, int(c1 / rate), kernel_size=7, padding=3),
            nn.BatchNorm2d(int(c1 / rate)),
            nn.ReLU(inplace=True),
            nn.Conv2d(c1 // rate, c2, kernel_size=7, padding=3, groups=rate) if group else
            nn.Conv2d(int(c1 / rate), c2, kernel_size=7, padding=3),
            nn.BatchNorm2d(c2),
        )

    def forward(self, x):
        b, c, h, w = x.shape
        x_permute = x.permute(0, 2, 3, 1).view(b, -1, c)
        x_att_permute = self.channel_attention(x_permute).view(b, h, w, c)
        x_channel_att = x_att_permute.permute(0, 3, 1, 2)
        x = x * x_channel_att
        x_spatial_att = self.spatial_attention(x).sigmoid()
        x_spatial_att = channel_shuffle(x_spatial_att, 4)
        return x * x_spatial_att
