"""A synthesized stack as the local stack reads it: the template, its assets, and CloudFormation's
intrinsic functions resolved against the local resources.

Only what the maas template uses is resolved (``Ref``, ``Fn::GetAtt``, ``Fn::Join``, ``Fn::Sub``,
``Fn::Select``, ``Fn::Split`` and the pseudo parameters); anything else raises ``Unresolvable`` naming
the resource, so a new construct that the local stack does not know fails loudly instead of running
with a wrong value."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACCOUNT = "123456789012"
REGION = "us-east-1"
PARTITION = "aws"
URL_SUFFIX = "amazonaws.com"


class Unresolvable(ValueError):
    """A value of the template that the local stack cannot compute."""


@dataclass
class Physical:
    """What a logical resource became locally: its ``Ref`` value and its ``Fn::GetAtt`` attributes."""

    ref: str
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass
class Assembly:
    """One stack of a cloud assembly directory (``cdk.out``): template, file assets, image assets."""

    directory: Path
    stack_name: str
    template: dict[str, Any]
    file_assets: dict[str, Path]
    image_assets: dict[str, tuple[Path, str]]

    @classmethod
    def load(cls, directory: Path, stack_name: str) -> Assembly:
        manifest = json.loads((directory / "manifest.json").read_text())
        artifact = manifest["artifacts"].get(stack_name)
        if artifact is None or artifact.get("type") != "aws:cloudformation:stack":
            stacks = [name for name, a in manifest["artifacts"].items() if a.get("type") == "aws:cloudformation:stack"]
            raise FileNotFoundError(f"no stack {stack_name!r} in {directory} (it has: {', '.join(stacks)})")
        template_file = artifact["properties"]["templateFile"]
        template = json.loads((directory / template_file).read_text())
        assets = json.loads((directory / f"{stack_name}.assets.json").read_text())

        def where(path: str) -> Path:
            candidate = Path(path)
            return candidate if candidate.is_absolute() else directory / candidate

        files = {asset_id: where(body["source"]["path"]) for asset_id, body in assets.get("files", {}).items()}
        images = {asset_id: (where(body["source"]["directory"]), body["source"].get("dockerFile", "Dockerfile"))
                  for asset_id, body in assets.get("dockerImages", {}).items()}
        return cls(directory, stack_name, template, files, images)

    @property
    def resources(self) -> dict[str, dict[str, Any]]:
        resources: dict[str, dict[str, Any]] = self.template["Resources"]
        return resources

    def of_type(self, kind: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for logical_id, body in self.resources.items():
            if body["Type"] == kind:
                yield logical_id, body.get("Properties", {})

    def file_asset(self, code: Mapping[str, Any]) -> Path:
        """The directory of a zip asset named by ``Code``/``Content`` (``S3Key: <hash>.zip``)."""
        key = code.get("S3Key")
        if not isinstance(key, str):
            raise Unresolvable(f"code {code!r} names no asset")
        asset_id = key.removesuffix(".zip")
        try:
            return self.file_assets[asset_id]
        except KeyError:
            raise Unresolvable(f"asset {asset_id} is not in the assembly") from None

    def image_asset(self, code: Mapping[str, Any], resolver: Resolver) -> tuple[Path, str]:
        """The build context and Dockerfile of an image named by ``Code.ImageUri`` (``...:<hash>``)."""
        uri = resolver.resolve(code.get("ImageUri"), "ImageUri")
        asset_id = str(uri).rsplit(":", 1)[-1]
        try:
            return self.image_assets[asset_id]
        except KeyError:
            raise Unresolvable(f"image asset {asset_id} is not in the assembly") from None


_SUB = re.compile(r"\$\{([^}]+)\}")


class Resolver:
    """Resolves intrinsic functions with the local resources' names (``physical``, filled as the local
    stack creates them) and the local account, region and stack name."""

    def __init__(self, stack_name: str, physical: dict[str, Physical] | None = None) -> None:
        self.stack_name = stack_name
        self.physical: dict[str, Physical] = physical if physical is not None else {}
        self.pseudo = {
            "AWS::AccountId": ACCOUNT, "AWS::Region": REGION, "AWS::Partition": PARTITION,
            "AWS::URLSuffix": URL_SUFFIX, "AWS::StackName": stack_name,
            "AWS::StackId": f"arn:aws:cloudformation:{REGION}:{ACCOUNT}:stack/{stack_name}/local",
            "AWS::NoValue": "",
        }

    def ref(self, name: str, where: str) -> str:
        if name in self.pseudo:
            return self.pseudo[name]
        found = self.physical.get(name)
        if found is None:
            raise Unresolvable(f"{where}: Ref {name} (not created locally, or not yet)")
        return found.ref

    def get_att(self, name: str, attribute: str, where: str) -> str:
        found = self.physical.get(name)
        if found is None or attribute not in found.attributes:
            raise Unresolvable(f"{where}: Fn::GetAtt {name}.{attribute}")
        return found.attributes[attribute]

    def resolve(self, value: Any, where: str) -> Any:
        """``value`` with every intrinsic function replaced by its local result."""
        if isinstance(value, list):
            return [self.resolve(item, where) for item in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            (key, argument), = value.items()
            if key == "Ref":
                return self.ref(argument, where)
            if key == "Fn::GetAtt":
                name, attribute = argument if isinstance(argument, list) else argument.split(".", 1)
                return self.get_att(name, attribute, where)
            if key == "Fn::Join":
                separator, parts = argument
                return str(separator).join(str(self.resolve(part, where)) for part in parts)
            if key == "Fn::Select":
                index, items = argument
                return self.resolve(items, where)[int(index)]
            if key == "Fn::Split":
                separator, text = argument
                return str(self.resolve(text, where)).split(separator)
            if key == "Fn::Sub":
                return self._sub(argument, where)
            if key.startswith("Fn::"):
                raise Unresolvable(f"{where}: {key} is not supported by the local stack")
        return {key: self.resolve(item, where) for key, item in value.items()}

    def _sub(self, argument: Any, where: str) -> str:
        text, variables = (argument, {}) if isinstance(argument, str) else argument
        values = {name: self.resolve(item, where) for name, item in variables.items()}

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in values:
                return str(values[name])
            if "." in name:
                logical, attribute = name.split(".", 1)
                return self.get_att(logical, attribute, where)
            return self.ref(name, where)

        return _SUB.sub(replace, text)
