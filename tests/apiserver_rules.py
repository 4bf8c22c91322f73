"""What a Kubernetes 1.28 API server checks before it stores an object: CRD schemas, custom resources, names, labels.

The test cluster (``tests/operator/cluster.py``) and the CRD tests use this module so that the suite
refuses what a real API server refuses. Each rule names its source in Kubernetes (paths inside
``k8s.io/apiextensions-apiserver`` unless said otherwise); the libraries do the work where one
exists: ``kubernetes.client`` lists the fields of ``JSONSchemaProps``, ``jsonschema`` checks the
OpenAPI bounds, and ``cel-expr-python`` (Google's CEL runtime) evaluates ``x-kubernetes-validations``.

- `schema_problems`: a CRD that ``kubectl apply`` (strict decoding) and the CRD registry accept.
- `admit`: what a create or update of a custom resource goes through: unknown fields refused or
  pruned, defaults, the OpenAPI schema, CEL rules (transition rules with the stored object).
- `object_problems`: names, labels and annotations of any object (``k8s.io/apimachinery`` validation);
  a Job's Pod volumes and mounts, and a Secret's data (and, updated, its immutability).
"""

from __future__ import annotations

import base64
import binascii
import copy
import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from cel_expr_python import cel
from kubernetes.client import V1JSONSchemaProps, V1ObjectMeta, V1ValidationRule

ROOT = Path(__file__).parents[1]
CRD_FILE = ROOT / "crds" / "federatedtrainings.fedtrain.io.yaml"

SCHEMA_KEYS = frozenset(V1JSONSchemaProps.attribute_map.values())
RULE_KEYS = frozenset(V1ValidationRule.attribute_map.values())
OBJECT_META_KEYS = frozenset(V1ObjectMeta.attribute_map.values())
# pkg/apis/apiextensions/validation/validation.go: openapiV3Types
OPENAPI_TYPES = frozenset({"string", "number", "integer", "boolean", "array", "object"})
# pkg/apis/apiextensions/validation/validation.go: specStandardValidatorV3.validate
UNSUPPORTED_KEYS = {"id": "id is not supported", "additionalItems": "additionalItems is not supported",
                    "patternProperties": "patternProperties is not supported",
                    "definitions": "definitions is not supported", "dependencies": "dependencies is not supported",
                    "$ref": "$ref is not supported"}
# pkg/apiserver/schema/validation.go: validateNestedValueValidation (inside allOf/anyOf/oneOf/not)
NOT_IN_VALUE_VALIDATION = ("type", "additionalProperties", "default", "title", "description", "nullable",
                           "x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource",
                           "x-kubernetes-int-or-string", "x-kubernetes-list-map-keys", "x-kubernetes-list-type",
                           "x-kubernetes-map-type", "x-kubernetes-validations")
OLD_SELF = re.compile(r"\boldSelf\b")
CEL_ENV = cel.NewEnv(variables={"self": cel.Type.DYN, "oldSelf": cel.Type.DYN})

# k8s.io/apimachinery/pkg/util/validation/validation.go
DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_SUBDOMAIN = rf"{DNS1123_LABEL}(\.{DNS1123_LABEL})*"
QUALIFIED_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
LABEL_VALUE = r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?"
LABEL_MESSAGE = ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must "
                 "start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for "
                 f"validation is '{DNS1123_LABEL}')")
SUBDOMAIN_MESSAGE = ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
                     "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for "
                     f"validation is '{DNS1123_SUBDOMAIN}')")
QUALIFIED_MESSAGE = ("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with "
                     "an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for "
                     f"validation is '{QUALIFIED_NAME}')")
LABEL_VALUE_MESSAGE = ("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', "
                       "and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or "
                       f"'12345', regex used for validation is '{LABEL_VALUE}')")
# k8s.io/apimachinery/pkg/api/validation/objectmeta.go: TotalAnnotationSizeLimitB
ANNOTATIONS_LIMIT = 256 * 1024
# Kinds whose names must be DNS labels (pkg/apis/core/validation: ValidateNamespaceName); every other kind the
# operator creates (Job, Pod, ServiceAccount, PVC, ConfigMap, Secret, Event, custom resources) takes a subdomain.
LABEL_NAMED_KINDS = frozenset({"Namespace", "Service"})


class Refused(Exception):
    """The API server's answer to a request it does not carry out: a ``Status`` with code, reason and causes."""

    def __init__(self, code: int, reason: str, message: str, causes: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.causes = code, reason, message, causes or []

    def status(self, kind: str = "", group: str = "", name: str = "") -> dict[str, Any]:
        """The ``details`` of the ``Status`` body, as a client reads them."""
        return {"name": name, "group": group, "kind": kind, "causes": self.causes}


@dataclass(frozen=True)
class FieldError:
    """One ``field.Error`` of k8s.io/apimachinery/pkg/util/validation/field, printed as the server prints it."""

    path: str  # "" is the root, printed "<nil>" as field.Path does
    # "Invalid value", "Required value", "Unsupported value", "Too long", "Too many", "Forbidden", "Not found",
    # "Duplicate value"
    kind: str
    detail: str = ""
    value: Any = field(default=None)
    show_value: bool = True

    def body(self) -> str:
        shown = f"{self.kind}: {go_value(self.value)}" if self.show_value else self.kind
        return f"{shown}: {self.detail}" if self.detail else shown

    def __str__(self) -> str:
        return f"{self.path or '<nil>'}: {self.body()}"

    def blocking(self) -> bool:
        """Errors that stop CEL rules from running (pkg/registry/customresource/strategy.go: hasBlockingErr)."""
        return self.kind in ("Unsupported value", "Required value", "Too long", "Too many") or \
            self.detail.startswith(f"{self.path} in body must be of type")

    def cause(self) -> dict[str, str]:
        reasons = {"Invalid value": "FieldValueInvalid", "Required value": "FieldValueRequired",
                   "Unsupported value": "FieldValueNotSupported", "Too long": "FieldValueTooLong",
                   "Too many": "FieldValueTooMany", "Forbidden": "FieldValueForbidden",
                   "Not found": "FieldValueNotFound", "Duplicate value": "FieldValueDuplicate"}
        return {"reason": reasons.get(self.kind, "FieldValueInvalid"), "message": self.body(),
                "field": self.path or "<nil>"}


def invalid(kind_group: str, name: str, errors: list[FieldError]) -> Refused:
    """422 Invalid as k8s.io/apimachinery/pkg/api/errors.NewInvalid words it."""
    listed = str(errors[0]) if len(errors) == 1 else "[" + ", ".join(str(e) for e in errors) + "]"
    return Refused(422, "Invalid", f'{kind_group} "{name}" is invalid: {listed}', [e.cause() for e in errors])


def go_value(value: Any) -> str:
    """A value as Go's ``%v``/``%q`` print it in field errors."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return json.dumps(value, sort_keys=True, default=str)


def child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# ---------------------------------------------------------------------------------------------------------------
# The CRD itself: strict decoding of JSONSchemaProps and the structural-schema rules.
# ---------------------------------------------------------------------------------------------------------------

def schema_problems(crd: dict[str, Any]) -> list[str]:
    """What the API server refuses in the CRD's schemas: unknown keywords, non-structural nodes, bad defaults/rules."""
    problems: list[str] = []
    for index, version in enumerate(crd["spec"]["versions"]):
        schema = (version.get("schema") or {}).get("openAPIV3Schema")
        path = f"spec.versions[{index}].schema.openAPIV3Schema"
        if schema is None:
            problems.append(f"{path}: Required value: because otherwise all fields are pruned")
            continue
        if schema.get("nullable"):  # validation.go: "nullable cannot be true at the root"
            problems.append(f"{path}.nullable: Forbidden: nullable cannot be true at the root")
        problems += list(_node_problems(schema, path, "root", correlatable=True))
    return problems


def _node_problems(node: Any, path: str, level: str, correlatable: bool) -> Iterator[str]:
    """One schema node and, recursively, its children; ``level`` is root, field or item."""
    if not isinstance(node, dict):
        yield f"{path}: Invalid value: must be a schema object"
        return
    for key in node:  # strict decoding (kubectl's default): "strict decoding error: unknown field ..."
        if key not in SCHEMA_KEYS:
            yield unknown_field(f"{path}.{key}")
    yield from _generic_problems(node, path, level)
    yield from _structural_problems(node, path, level)
    yield from _rule_problems(node, path, correlatable)
    yield from _default_problems(node, path)
    for keyword in ("allOf", "anyOf", "oneOf"):
        for index, nested in enumerate(node.get(keyword) or []):
            yield from _value_validation_problems(nested, f"{path}.{keyword}[{index}]")
    if "not" in node:
        yield from _value_validation_problems(node["not"], f"{path}.not")
    for name, prop in (node.get("properties") or {}).items():
        if level == "root" and name == "metadata":
            yield from _metadata_problems(prop, f"{path}.properties[{name}]")
            continue
        yield from _node_problems(prop, f"{path}.properties[{name}]", "field", correlatable)
    if isinstance(node.get("additionalProperties"), dict):
        yield from _node_problems(node["additionalProperties"], f"{path}.additionalProperties", "field", correlatable)
    if isinstance(node.get("items"), dict):
        # Only the items of map lists correlate with the old list's (pkg/apiserver/schema/cel/compilation.go).
        keyed = node.get("x-kubernetes-list-type") == "map"
        yield from _node_problems(node["items"], f"{path}.items", "item", correlatable and keyed)


def unknown_field(path: str) -> str:
    """The strict decoder's words; it names map keys with dots (``properties.spec``), not brackets."""
    dotted = re.sub(r"\[([^]0-9][^]]*)]", r".\1", path)
    return f'strict decoding error: unknown field "{dotted}"'


def _generic_problems(node: dict[str, Any], path: str, level: str) -> Iterator[str]:
    """pkg/apis/apiextensions/validation/validation.go: ValidateCustomResourceDefinitionOpenAPISchema."""
    kind = node.get("type")
    if kind is not None and kind not in OPENAPI_TYPES:
        message = "type cannot be set to null, use nullable as an alternative" if kind == "null" else \
            f"Unsupported value: {go_value(kind)}"
        yield f"{path}.type: {message}"
    for key, message in UNSUPPORTED_KEYS.items():
        if node.get(key):
            yield f"{path}.{key}: Forbidden: {message}"
    if node.get("uniqueItems"):
        yield f"{path}.uniqueItems: Forbidden: uniqueItems cannot be set to true since the runtime complexity " \
              "becomes quadratic"
    if isinstance(node.get("items"), list):
        yield f"{path}.items: Forbidden: items must be a schema object and not an array"
    extra = node.get("additionalProperties")
    if extra is not None and node.get("properties") and extra is not True:
        yield f"{path}.additionalProperties: Forbidden: additionalProperties and properties are mutual exclusive"
    if node.get("x-kubernetes-preserve-unknown-fields") is False:
        yield f"{path}.x-kubernetes-preserve-unknown-fields: Invalid value: false: must be true or undefined"
    if node.get("x-kubernetes-int-or-string") and node.get("x-kubernetes-preserve-unknown-fields"):
        yield f"{path}.x-kubernetes-preserve-unknown-fields: Invalid value: true: must be false if " \
              "x-kubernetes-int-or-string is true"
    if "x-kubernetes-list-type" in node and kind != "array":
        yield f"{path}.type: Required value: must be array if x-kubernetes-list-type is specified"
    if "x-kubernetes-map-type" in node and kind != "object":
        yield f"{path}.type: Required value: must be object if x-kubernetes-map-type is specified"
    if "pattern" in node:
        try:
            re.compile(node["pattern"])
        except re.error as error:
            yield f"{path}.pattern: Invalid value: {go_value(node['pattern'])}: must be a valid regular expression, " \
                  f"but isn't: {error}"


def _structural_problems(node: dict[str, Any], path: str, level: str) -> Iterator[str]:
    """pkg/apiserver/schema/validation.go: validateStructuralInvariants."""
    kind = node.get("type")
    if kind == "array" and "items" not in node:
        yield f"{path}.items: Required value: must be specified"
    if level == "root" and "additionalProperties" in node:
        yield f"{path}.additionalProperties: Forbidden: must not be used at the root"
    if node.get("x-kubernetes-embedded-resource") and kind != "object":
        yield f"{path}.type: Required value: must be object if x-kubernetes-embedded-resource is true"
    elif not (kind or node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")):
        where = {"root": "at the root", "item": "for specified array items", "field": "for specified object fields"}
        yield f"{path}.type: Required value: must not be empty {where[level]}"
    if level == "root" and kind and kind != "object":
        yield f"{path}.type: Invalid value: {go_value(kind)}: must be object at the root"
    if level == "root":
        for name in ("kind", "apiVersion"):
            prop = (node.get("properties") or {}).get(name)
            if prop is not None and prop.get("type") != "string":
                yield f"{path}.properties[{name}].type: Invalid value: {go_value(prop.get('type'))}: must be string"


def _metadata_problems(node: dict[str, Any], path: str) -> Iterator[str]:
    """pkg/apiserver/schema/validation.go: validateStructuralMetadataInvariants (at the root only name/generateName)."""
    for key in node:
        if key not in SCHEMA_KEYS:
            yield unknown_field(f"{path}.{key}")
    if node.get("type", "object") != "object":
        yield f"{path}.type: Invalid value: {go_value(node['type'])}: must be object"
    names = set(node.get("properties") or {})
    rest = {k for k in node if k not in ("type", "properties")}
    if rest or not names <= {"name", "generateName"}:
        yield f"{path}: Forbidden: must not specify anything other than name and generateName, but metadata is " \
              "implicitly specified"


def _value_validation_problems(node: Any, path: str) -> Iterator[str]:
    """pkg/apiserver/schema/validation.go: validateNestedValueValidation: logic keywords hold value checks only."""
    if not isinstance(node, dict):
        return
    for key in node:
        if key not in SCHEMA_KEYS:
            yield unknown_field(f"{path}.{key}")
        elif key in NOT_IN_VALUE_VALIDATION:
            yield f"{path}.{key}: Forbidden: must be empty to be structural"
    for name, prop in (node.get("properties") or {}).items():
        yield from _value_validation_problems(prop, f"{path}.properties[{name}]")
    if isinstance(node.get("items"), dict):
        yield from _value_validation_problems(node["items"], f"{path}.items")


def _rule_problems(node: dict[str, Any], path: str, correlatable: bool) -> Iterator[str]:
    """pkg/apis/apiextensions/validation/validation.go: the x-kubernetes-validations checks, and that rules compile."""
    for index, rule in enumerate(node.get("x-kubernetes-validations") or []):
        where = f"{path}.x-kubernetes-validations[{index}]"
        for key in rule:
            if key not in RULE_KEYS:
                yield unknown_field(f"{where}.{key}")
        text = rule.get("rule", "")
        if not text:
            yield f"{where}.rule: Required value: rule is not specified"
            continue
        message = rule.get("message")
        if message is not None and (not message.strip() or "\n" in message):
            yield f"{where}.message: Invalid value: {go_value(message)}: must be non-empty and without line breaks"
        if message is None and "\n" in text:
            yield f"{where}.message: Required value: message must be specified if rule contains line breaks"
        if rule.get("reason") not in (None, "FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired",
                                      "FieldValueDuplicate"):
            yield f"{where}.reason: Unsupported value: {go_value(rule['reason'])}"
        try:
            compiled(text)
        except RuntimeError as error:
            yield f"{where}.rule: Invalid value: {go_value(text)}: compilation failed: {error}"
        if OLD_SELF.search(text) and not correlatable:
            yield f"{where}.rule: Invalid value: {go_value(text)}: oldSelf cannot be used on the uncorrelatable " \
                  "portion of the schema"


def _default_problems(node: dict[str, Any], path: str) -> Iterator[str]:
    """pkg/apiserver/schema/defaulting/validation.go: a default is pruned and passes its node's schema and rules."""
    if "default" not in node:
        return
    value = node["default"]
    if value is None and not node.get("nullable"):
        yield f"{path}.default: Invalid value: null: must not be null for a non-nullable field"
        return
    pruned = copy.deepcopy(value)
    _prune(pruned, node, "", [])
    if pruned != value:
        yield f"{path}.default: Invalid value: {go_value(value)}: must not have unknown fields"
    for error in _schema_errors(node, value, f"{path}.default"):
        yield str(error)
    for error in _cel_errors(node, value, value, f"{path}.default", root=False):
        yield str(error)


def _prune(value: Any, node: dict[str, Any] | None, path: str, pruned: list[str]) -> None:
    """pkg/apiserver/schema/pruning/algorithm.go: drop fields the schema does not know (their paths into ``pruned``)."""
    if node is None:
        return
    if isinstance(value, dict):
        properties = node.get("properties")
        extra = node.get("additionalProperties")
        for key in list(value):
            if properties is not None and key in properties:
                _prune(value[key], properties[key], child(path, key), pruned)
            elif isinstance(extra, dict):
                _prune(value[key], extra, f"{path}[{key}]", pruned)
            elif extra is True or node.get("x-kubernetes-preserve-unknown-fields"):
                continue
            else:
                pruned.append(child(path, key))
                del value[key]
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for index, item in enumerate(value):
            _prune(item, node["items"], f"{path}[{index}]", pruned)


# ---------------------------------------------------------------------------------------------------------------
# Admission of a custom resource.
# ---------------------------------------------------------------------------------------------------------------

def load_crd(path: Path = CRD_FILE) -> dict[str, Any]:
    """The checked-in CRD."""
    return dict(yaml.safe_load(path.read_text()))


def root_schema(crd: dict[str, Any]) -> dict[str, Any]:
    """The storage version's openAPIV3Schema."""
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    return dict(version["schema"]["openAPIV3Schema"])


def admit(crd: dict[str, Any], new: dict[str, Any], old: dict[str, Any] | None = None,
          field_validation: str = "Warn", subresource: str | None = None,
          warnings: list[str] | None = None) -> dict[str, Any]:
    """What the API server stores for a create (``old`` None) or an update of a custom resource, or `Refused`.

    ``field_validation`` is the request's ``fieldValidation``: ``Strict`` refuses unknown fields (what
    ``kubectl`` asks for), ``Warn`` (the server's default, and what the Python client gets) and
    ``Ignore`` prune them. ``subresource="status"`` changes the status only; an update of the object
    keeps the old status (pkg/registry/customresource/strategy.go: PrepareForCreate/PrepareForUpdate).
    """
    schema = root_schema(crd)
    names = crd["spec"]["names"]
    kind_group = f"{names['kind']}.{crd['spec']['group']}"
    version = next(v["name"] for v in crd["spec"]["versions"] if v.get("storage"))
    obj = copy.deepcopy(new)
    unknown = _unknown_fields(obj, schema)
    if unknown and field_validation == "Strict":
        listed = ", ".join(f'unknown field "{p}"' for p in unknown)
        raise Refused(400, "BadRequest", f'{names["kind"]} in version "{version}" cannot be handled as a '
                                         f'{names["kind"]}: strict decoding error: {listed}')
    if warnings is not None and field_validation == "Warn":
        warnings += [f'unknown field "{p}"' for p in unknown]
    obj = _prepare(obj, old, subresource)
    _prune_nulls(obj, schema)  # pkg/apiserver/schema/defaulting/prunenulls.go
    _default(obj, schema)  # pkg/apiserver/schema/defaulting/algorithm.go
    name = (obj.get("metadata") or {}).get("name", "")
    errors = object_meta_errors(names["kind"], obj.get("metadata") or {})
    errors += _schema_errors(schema, _without_metadata(obj), "")
    if not any(e.blocking() for e in errors):  # strategy.go: CEL runs only on an object without blocking errors
        errors += _cel_errors(schema, obj, old, "")
    if errors:
        raise invalid(kind_group, name, errors)
    return obj


def _unknown_fields(obj: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Prune ``obj`` in place and return the pruned paths; metadata is decoded as an ObjectMeta."""
    pruned: list[str] = []
    properties = schema.get("properties") or {}
    for key in list(obj):
        if key in ("apiVersion", "kind"):
            continue
        if key == "metadata" and isinstance(obj[key], dict):
            for name in [k for k in obj[key] if k not in OBJECT_META_KEYS]:
                pruned.append(f"metadata.{name}")
                del obj[key][name]
        elif key in properties:
            _prune(obj[key], properties[key], key, pruned)
        elif not schema.get("x-kubernetes-preserve-unknown-fields"):
            pruned.append(key)
            del obj[key]
    return pruned


def _prepare(obj: dict[str, Any], old: dict[str, Any] | None, subresource: str | None) -> dict[str, Any]:
    """The status subresource: a create drops status; an update keeps old status, a status update only status."""
    if old is None:
        obj.pop("status", None)
        return obj
    if subresource == "status":
        kept = copy.deepcopy(old)
        kept.pop("status", None)
        if "status" in obj:
            kept["status"] = obj["status"]
        return kept
    obj.pop("status", None)
    if "status" in old:
        obj["status"] = copy.deepcopy(old["status"])
    return obj


def _prune_nulls(value: Any, node: dict[str, Any] | None) -> None:
    """Nulls where the schema allows none and has no default are dropped before defaulting."""
    if node is None:
        return
    if isinstance(value, dict):
        for key in list(value):
            sub = _property(node, key)
            if value[key] is None and sub is not None and not sub.get("nullable") and "default" not in sub:
                del value[key]
            else:
                _prune_nulls(value[key], sub)
    elif isinstance(value, list):
        for item in value:
            _prune_nulls(item, node.get("items"))


def _property(node: dict[str, Any], key: str) -> dict[str, Any] | None:
    properties = node.get("properties") or {}
    if key in properties:
        return dict(properties[key])
    extra = node.get("additionalProperties")
    return dict(extra) if isinstance(extra, dict) else None


def _default(value: Any, node: dict[str, Any] | None) -> None:
    """Missing (or null non-nullable) fields get their default; then the fields, defaults included, recursively."""
    if node is None:
        return
    if isinstance(value, dict):
        for key, prop in (node.get("properties") or {}).items():
            if "default" in prop and (key not in value or (value[key] is None and not prop.get("nullable"))):
                value[key] = copy.deepcopy(prop["default"])
        for key in value:
            _default(value[key], _property(node, key))
    elif isinstance(value, list):
        for item in value:
            _default(item, node.get("items"))


def _without_metadata(obj: dict[str, Any]) -> dict[str, Any]:
    """ObjectMeta is validated as such, not by the schema (pkg/apiserver/validation: metadata is coerced apart)."""
    return {k: v for k, v in obj.items() if k != "metadata"}


# ---------------------------------------------------------------------------------------------------------------
# OpenAPI validation (kube-openapi), through jsonschema.
# ---------------------------------------------------------------------------------------------------------------

def as_json_schema(node: Any) -> Any:
    """Kubernetes OpenAPI v3 -> JSON Schema draft 4: ``nullable`` becomes a null type, ``x-kubernetes-*`` goes."""
    if isinstance(node, list):
        return [as_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: as_json_schema(v) for k, v in node.items()
           if not k.startswith("x-kubernetes") and k not in ("nullable", "default", "description")}
    if "properties" in node:
        out["properties"] = {k: as_json_schema(v) for k, v in node["properties"].items() if k != "metadata"}
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    return out


@functools.lru_cache(maxsize=256)
def _validator(schema_json: str) -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(as_json_schema(json.loads(schema_json)))


def _schema_errors(node: dict[str, Any], value: Any, path: str) -> list[FieldError]:
    """kube-openapi's errors as pkg/apiserver/validation/validation.go: kubeOpenAPIResultToFieldErrors words them."""
    validator = _validator(json.dumps(node, sort_keys=True))
    found = sorted(validator.iter_errors(value), key=lambda e: [str(p) for p in e.absolute_path])
    return [_field_error(error, path) for error in found]


def _json_path(base: str, parts: Any) -> str:
    path = base
    for part in parts:
        path = f"{path}[{part}]" if isinstance(part, int) else child(path, str(part))
    return path


def _field_error(error: jsonschema.ValidationError, base: str) -> FieldError:
    path = _json_path(base, error.absolute_path)
    keyword, limit, value = error.validator, error.validator_value, error.instance
    schema = error.schema if isinstance(error.schema, dict) else {}
    if keyword == "required":
        missing = re.match(r"'(.+)' is a required property", error.message)
        return FieldError(child(path, missing.group(1) if missing else "?"), "Required value", show_value=False)
    if keyword == "enum":
        allowed = ", ".join(go_value(v) for v in limit if v is not None)
        return FieldError(path, "Unsupported value", f"supported values: {allowed}", value)
    if keyword == "type":
        actual = _json_type(value)
        return FieldError(path, "Invalid value", f"{path} in body must be of type {_type_name(limit)}: "
                                                 f"{go_value(actual)}", actual)
    if keyword == "maxLength":
        return FieldError(path, "Too long", f"may not be longer than {limit}", show_value=False)
    if keyword in ("maxItems", "maxProperties"):
        return FieldError(path, "Too many", f"must have at most {limit} items", len(value))
    details = {
        "minimum": lambda: f"should be greater than {'' if schema.get('exclusiveMinimum') else 'or equal to '}"
                           f"{go_value(limit)}",
        "maximum": lambda: f"should be less than {'' if schema.get('exclusiveMaximum') else 'or equal to '}"
                           f"{go_value(limit)}",
        "minLength": lambda: f"should be at least {limit} chars long",
        "pattern": lambda: f"should match '{limit}'",
        "minItems": lambda: f"should have at least {limit} items",
        "minProperties": lambda: f"should have at least {limit} properties",
        "multipleOf": lambda: f"should be a multiple of {go_value(limit)}",
    }
    detail = details[keyword]() if keyword in details else error.message
    return FieldError(path, "Invalid value", f"{path} in body {detail}", value)


def _json_type(value: Any) -> str:
    for name, kind in (("boolean", bool), ("integer", int), ("number", float), ("string", str), ("array", list),
                       ("object", dict)):
        if isinstance(value, kind):
            return name
    return "null"


def _type_name(limit: Any) -> str:
    return str(next(t for t in limit if t != "null")) if isinstance(limit, list) else str(limit)


# ---------------------------------------------------------------------------------------------------------------
# CEL: x-kubernetes-validations, evaluated with the real semantics of k8s.io/apiserver's CEL library.
# ---------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=512)
def compiled(rule: str) -> Any:
    """A CEL program; RuntimeError if the rule does not compile."""
    return CEL_ENV.compile(rule)


def rules_of(crd: dict[str, Any]) -> list[tuple[str, dict[str, str]]]:
    """Every x-kubernetes-validations rule of the CRD with its path (``""`` is the root, ``spec.model`` ...)."""
    found: list[tuple[str, dict[str, str]]] = []

    def walk(node: dict[str, Any], path: str) -> None:
        found.extend((path, rule) for rule in node.get("x-kubernetes-validations") or [])
        for name, prop in (node.get("properties") or {}).items():
            walk(prop, child(path, name))
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}[*]")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[*]")

    walk(root_schema(crd), "")
    return found


def cel_value(value: Any, node: dict[str, Any] | None, root: bool = False) -> Any:
    """A JSON value as the API server hands it to CEL.

    Null fields of objects with properties are absent (``has()`` is false: k8s.io/apiserver/pkg/cel/common/
    values.go); ``number`` fields are doubles; at the root, metadata shows only name and generateName.
    """
    node = node or {}
    if isinstance(value, dict):
        typed = "properties" in node
        out: dict[str, Any] = {}
        for key, item in value.items():
            if typed and item is None:
                continue
            if root and key == "metadata" and isinstance(item, dict):
                out[key] = {k: item[k] for k in ("name", "generateName") if k in item}
                continue
            out[key] = cel_value(item, _property(node, key))
        return out
    if isinstance(value, list):
        return [cel_value(item, node.get("items")) for item in value]
    if node.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _cel_errors(node: dict[str, Any], value: Any, old: Any, path: str, root: bool = True) -> list[FieldError]:
    """Every rule under ``node`` where ``value`` has a value; transition rules only where ``old`` has one too."""
    errors: list[FieldError] = []
    if value is None:
        return errors
    rules = node.get("x-kubernetes-validations") or []
    if rules:
        self_value = cel_value(value, node, root)
        old_value = None if old is None else cel_value(old, node, root)
        for rule in rules:
            uses_old = bool(OLD_SELF.search(rule["rule"]))
            if uses_old and old_value is None:
                continue  # a transition rule has nothing to compare on a create or a new field
            failure = _evaluate(rule, self_value, old_value if uses_old else None)
            if failure is not None:
                errors.append(_rule_error(rule, path, node, failure))
    if isinstance(value, dict):
        for key, item in value.items():
            sub = _property(node, key)
            if sub is None or (root and key == "metadata"):
                continue
            was = old.get(key) if isinstance(old, dict) else None
            where = child(path, key) if key in (node.get("properties") or {}) else f"{path}[{key}]"
            errors += _cel_errors(sub, item, was, where, root=False)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for index, item in enumerate(value):
            errors += _cel_errors(node["items"], item, _old_item(node, item, old), f"{path}[{index}]", root=False)
    return errors


def _old_item(node: dict[str, Any], item: Any, old: Any) -> Any:
    """The old list's item with the same keys in a map list; None elsewhere (atomic and set lists do not correlate)."""
    keys = node.get("x-kubernetes-list-map-keys") or []
    if node.get("x-kubernetes-list-type") != "map" or not isinstance(old, list) or not isinstance(item, dict):
        return None
    return next((o for o in old if isinstance(o, dict) and all(o.get(k) == item.get(k) for k in keys)), None)


def _evaluate(rule: dict[str, str], self_value: Any, old_value: Any) -> str | None:
    """None if the rule holds, else the message (or the evaluation error, as the API server reports it)."""
    data = {"self": self_value} if old_value is None else {"self": self_value, "oldSelf": old_value}
    result = compiled(rule["rule"]).eval(data=data)
    if result.type() == cel.Type.ERROR:
        return f"{rule['rule']}: evaluation error: {result.value()}"
    if result.value() is True:
        return None
    if rule.get("messageExpression"):
        message = compiled(rule["messageExpression"]).eval(data=data)
        if message.type() == cel.Type.STRING and str(message.value()).strip():
            return str(message.value())
    return rule.get("message") or f"failed rule: {rule['rule']}"


def _rule_error(rule: dict[str, str], path: str, node: dict[str, Any], message: str) -> FieldError:
    """pkg/apiserver/schema/cel/validation.go: the error carries the node's type as its value."""
    where = path + rule.get("fieldPath", "") if rule.get("fieldPath") else path
    kinds = {"FieldValueForbidden": "Forbidden", "FieldValueRequired": "Required value",
             "FieldValueDuplicate": "Duplicate value"}
    kind = kinds.get(rule.get("reason", ""), "Invalid value")
    return FieldError(where.lstrip("."), kind, message, node.get("type", "object"), show_value=kind == "Invalid value")


# ---------------------------------------------------------------------------------------------------------------
# Names, labels and annotations of any object (k8s.io/apimachinery/pkg/api/validation/objectmeta.go).
# ---------------------------------------------------------------------------------------------------------------

def name_errors(kind: str, name: str, path: str = "metadata.name") -> list[FieldError]:
    """A DNS label for Namespaces and Services, a DNS subdomain (253 characters) for everything else."""
    if not name:
        return [FieldError(path, "Required value", "name or generateName is required", show_value=False)]
    if kind in LABEL_NAMED_KINDS:
        problems = ([] if len(name) <= 63 else ["must be no more than 63 characters"]) + \
            ([] if re.fullmatch(DNS1123_LABEL, name) else [LABEL_MESSAGE])
    else:
        problems = ([] if len(name) <= 253 else ["must be no more than 253 characters"]) + \
            ([] if re.fullmatch(DNS1123_SUBDOMAIN, name) else [SUBDOMAIN_MESSAGE])
    return [FieldError(path, "Invalid value", problem, name) for problem in problems]


def label_errors(labels: dict[str, Any], path: str = "metadata.labels") -> list[FieldError]:
    """Keys are qualified names; values at most 63 characters of the label-value alphabet (ValidateLabels)."""
    errors = [FieldError(path, "Invalid value", problem, key) for key in labels for problem in _key_problems(key)]
    for value in labels.values():
        if not isinstance(value, str):
            errors.append(FieldError(path, "Invalid value", "must be a string", value))
            continue
        if len(value) > 63:
            errors.append(FieldError(path, "Invalid value", "must be no more than 63 characters", value))
        if not re.fullmatch(LABEL_VALUE, value):
            errors.append(FieldError(path, "Invalid value", LABEL_VALUE_MESSAGE, value))
    return errors


def _key_problems(key: str) -> list[str]:
    """IsQualifiedName: an optional DNS-subdomain prefix and a slash, then a name of at most 63 characters."""
    prefix, _, name = key.rpartition("/")
    problems = []
    if "/" in key and not prefix:
        problems.append("prefix part must be non-empty")
    elif prefix and (len(prefix) > 253 or not re.fullmatch(DNS1123_SUBDOMAIN, prefix)):
        problems.append(f"prefix part {SUBDOMAIN_MESSAGE}")
    if not name:
        problems.append("name part must be non-empty")
    elif len(name) > 63:
        problems.append("name part must be no more than 63 characters")
    if name and not re.fullmatch(QUALIFIED_NAME, name):
        problems.append(QUALIFIED_MESSAGE)
    return problems


def annotation_errors(annotations: dict[str, Any], path: str = "metadata.annotations") -> list[FieldError]:
    """Keys are qualified names (lower-cased first); keys and values together at most 256 KiB."""
    errors = [FieldError(path, "Invalid value", problem, key)
              for key in annotations for problem in _key_problems(key.lower())]
    size = sum(len(k) + len(str(v)) for k, v in annotations.items())
    if size > ANNOTATIONS_LIMIT:
        errors.append(FieldError(path, "Too long", f"must have at most {ANNOTATIONS_LIMIT} bytes", show_value=False))
    return errors


def object_meta_errors(kind: str, metadata: dict[str, Any]) -> list[FieldError]:
    """ValidateObjectMeta: the name for the kind, labels and annotations."""
    return (name_errors(kind, str(metadata.get("name") or ""))
            + label_errors(metadata.get("labels") or {})
            + annotation_errors(metadata.get("annotations") or {}))


def job_errors(job: dict[str, Any]) -> list[FieldError]:
    """pkg/apis/batch/validation: the Job's name becomes the value of its Pods' job-name labels (so at most 63)."""
    template = (job.get("spec") or {}).get("template") or {}
    labels = dict((template.get("metadata") or {}).get("labels") or {})
    name = str((job.get("metadata") or {}).get("name") or "")
    labels.update({"batch.kubernetes.io/job-name": name, "job-name": name})
    return label_errors(labels, "spec.template.metadata.labels")


# ---------------------------------------------------------------------------------------------------------------
# Secrets and the volumes of a Job's Pod template (k8s.io/kubernetes/pkg/apis/core/validation/validation.go:
# ValidateSecret, ValidateSecretUpdate, validateVolumes, validateSecretVolumeSource, validateVolumeMounts).
# ---------------------------------------------------------------------------------------------------------------

CONFIG_KEY = r"[-._a-zA-Z0-9]+"
CONFIG_KEY_MESSAGE = ("a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name', "
                      " or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')")
SECRET_LIMIT = 1024 * 1024  # core.MaxSecretSize: the decoded data together
FILE_MODE_MESSAGE = "must be a number between 0 and 0777 (octal), both inclusive"
IMMUTABLE_WHEN_SET = "field is immutable when `immutable` is set"
BASE64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


def config_key_problems(key: str) -> list[str]:
    """IsConfigMapKey: a Secret's or ConfigMap's data key."""
    problems = [] if len(key) <= 253 else ["must be no more than 253 characters"]
    if not re.fullmatch(CONFIG_KEY, key):
        problems.append(CONFIG_KEY_MESSAGE)
    if key in (".", ".."):
        problems.append(f"must not be '{key}'")
    elif key.startswith(".."):
        problems.append("must not start with '..'")
    return problems


def decoded_secret_data(secret: dict[str, Any]) -> dict[str, bytes]:
    """A Secret's data as the server decodes it; undecodable base64 is its 400 (the JSON never becomes a Secret)."""
    decoded = {}
    for key, value in (secret.get("data") or {}).items():
        text = str(value)
        try:
            decoded[key] = base64.b64decode(text, validate=True)
        except binascii.Error:
            # Go's CorruptInputError names the first byte it could not use: a character outside the alphabet, else
            # (missing or misplaced padding) the end.
            at = next((i for i, char in enumerate(text) if char not in BASE64_ALPHABET), len(text))
            raise Refused(400, "BadRequest", f'Secret in version "v1" cannot be handled as a Secret: illegal base64 '
                                             f"data at input byte {at}") from None
    return decoded


def secret_errors(secret: dict[str, Any], old: dict[str, Any] | None) -> list[FieldError]:
    """ValidateSecret (data keys, 1 MiB in all) and, for an update, ValidateSecretUpdate (type; immutable Secrets)."""
    data = decoded_secret_data(secret)
    errors = [FieldError(f"data[{key}]", "Invalid value", problem, key)
              for key in data for problem in config_key_problems(key)]
    if sum(len(value) for value in data.values()) > SECRET_LIMIT:
        errors.append(FieldError("data", "Too long", f"must have at most {SECRET_LIMIT} bytes", show_value=False))
    if old is None:
        return errors
    if secret.get("type", "Opaque") != old.get("type", "Opaque"):
        errors.append(FieldError("type", "Invalid value", "field is immutable", secret.get("type")))
    if old.get("immutable") is True:
        if secret.get("immutable") is not True:
            errors.append(FieldError("immutable", "Forbidden", IMMUTABLE_WHEN_SET, show_value=False))
        if data != decoded_secret_data(old):
            errors.append(FieldError("data", "Forbidden", IMMUTABLE_WHEN_SET, show_value=False))
    return errors


def _mode_errors(mode: Any, path: str) -> list[FieldError]:
    return [FieldError(path, "Invalid value", FILE_MODE_MESSAGE, mode)] if mode is not None and \
        not 0 <= int(mode) <= 0o777 else []


def secret_volume_errors(source: dict[str, Any], path: str) -> list[FieldError]:
    """validateSecretVolumeSource: a Secret's name, file modes, and items that stay inside the volume."""
    errors = [] if source.get("secretName") else [FieldError(f"{path}.secretName", "Required value",
                                                             show_value=False)]
    errors += _mode_errors(source.get("defaultMode"), f"{path}.defaultMode")
    for index, item in enumerate(source.get("items") or []):
        at = f"{path}.items[{index}]"
        target = str(item.get("path") or "")
        errors += [FieldError(f"{at}.{key}", "Required value", show_value=False) for key in ("key", "path")
                   if not item.get(key)]
        if target.startswith("/"):
            errors.append(FieldError(f"{at}.path", "Invalid value", "must be a relative path", target))
        if ".." in target.split("/"):
            errors.append(FieldError(f"{at}.path", "Invalid value", "must not contain '..'", target))
        elif target.startswith(".."):
            errors.append(FieldError(f"{at}.path", "Invalid value", "must not start with '..'", target))
        errors += _mode_errors(item.get("mode"), f"{at}.mode")
    return errors


def pod_volume_errors(pod: dict[str, Any], path: str) -> list[FieldError]:
    """validateVolumes and validateVolumeMounts: unique volume names, secret sources, mounts of declared volumes."""
    errors: list[FieldError] = []
    names: set[str] = set()
    for index, volume in enumerate(pod.get("volumes") or []):
        at, name = f"{path}.volumes[{index}]", str(volume.get("name") or "")
        if not name:
            errors.append(FieldError(f"{at}.name", "Required value", show_value=False))
        elif name in names:
            errors.append(FieldError(f"{at}.name", "Duplicate value", value=name))
        elif len(name) > 63 or not re.fullmatch(DNS1123_LABEL, name):
            errors.append(FieldError(f"{at}.name", "Invalid value", LABEL_MESSAGE, name))
        names.add(name)
        if volume.get("secret") is not None:
            errors += secret_volume_errors(volume["secret"], f"{at}.secret")
    for number, container in enumerate(pod.get("containers") or []):
        mounted: set[str] = set()
        for index, mount in enumerate(container.get("volumeMounts") or []):
            at, target = f"{path}.containers[{number}].volumeMounts[{index}]", str(mount.get("mountPath") or "")
            if mount.get("name") not in names:
                errors.append(FieldError(f"{at}.name", "Not found", value=mount.get("name")))
            if not target:
                errors.append(FieldError(f"{at}.mountPath", "Required value", show_value=False))
            elif target in mounted:
                errors.append(FieldError(f"{at}.mountPath", "Invalid value", "must be unique", target))
            mounted.add(target)
    return errors


def object_problems(kind: str, obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[FieldError]:
    """Everything this module checks on an object of ``kind`` that is not a custom resource with a schema.

    ``old``: the stored object an update replaces.
    """
    errors = object_meta_errors(kind, obj.get("metadata") or {})
    if kind == "Job":
        errors += job_errors(obj)
        errors += pod_volume_errors(((obj.get("spec") or {}).get("template") or {}).get("spec") or {},
                                    "spec.template.spec")
    if kind == "Secret":
        errors += secret_errors(obj, old)
    return errors


def refuse_object(kind: str, group: str, obj: dict[str, Any], old: dict[str, Any] | None = None) -> None:
    """Raise the server's 422 (or 400) if the object is invalid (or, updating ``old``, an invalid change)."""
    errors = object_problems(kind, obj, old)
    if errors:
        kind_group = f"{kind}.{group}" if group else kind
        raise invalid(kind_group, str((obj.get("metadata") or {}).get("name") or ""), errors)
