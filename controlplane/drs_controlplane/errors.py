"""AWS error responses as the DRS front end sends them: status, x-amzn-ErrorType, JSON body."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SIGNATURE_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. Check your AWS Secret "
    "Access Key and signing method. Consult the service documentation for details."
)
INVALID_TOKEN = "The security token included in the request is invalid."
EXPIRED_TOKEN = "The security token included in the request is expired"


@dataclass
class ApiError(Exception):
    """An error response. `fields` become JSON body members beside `message`; `headers` HTTP headers."""

    status: int
    code: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def body(self) -> dict[str, Any]:
        return {"message": self.message, **self.fields}


def validation(
    message: str, field_list: list[tuple[str, str]] | None = None, reason: str = "fieldValidationFailed"
) -> ApiError:
    fields: dict[str, Any] = {"reason": reason}
    if field_list:
        fields["fieldList"] = [{"name": name, "message": text} for name, text in field_list]
    return ApiError(400, "ValidationException", message, fields)


def not_found(resource_type: str, resource_id: str, what: str) -> ApiError:
    return ApiError(
        404,
        "ResourceNotFoundException",
        f"{what} {resource_id} not found",
        {"resourceId": resource_id, "resourceType": resource_type},
    )


def conflict(resource_type: str, resource_id: str, message: str) -> ApiError:
    return ApiError(409, "ConflictException", message, {"resourceId": resource_id, "resourceType": resource_type})


def access_denied(message: str) -> ApiError:
    return ApiError(403, "AccessDeniedException", message)


def throttling(retry_after: int) -> ApiError:
    return ApiError(429, "ThrottlingException", "Rate exceeded", headers={"Retry-After": str(retry_after)})


def internal() -> ApiError:
    return ApiError(500, "InternalServerException", "An internal error occurred. Please retry your request.")
