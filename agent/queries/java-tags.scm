; Java definitions: classes, records and enums, interfaces and annotation types, methods and constructors (method),
; and UPPER_CASE `static final` fields and interface fields (constant).

(class_declaration name: (identifier) @name) @definition.class
(record_declaration name: (identifier) @name) @definition.class
(enum_declaration name: (identifier) @name) @definition.enum
(interface_declaration name: (identifier) @name) @definition.interface
(annotation_type_declaration name: (identifier) @name) @definition.interface

(method_declaration name: (identifier) @name) @definition.method
(constructor_declaration name: (identifier) @name) @definition.method
(compact_constructor_declaration name: (identifier) @name) @definition.method
(annotation_type_element_declaration name: (identifier) @name) @definition.method

; every declarator of `static final int A = 1, B = 2;`, with the modifiers in either order
(field_declaration
  (modifiers "static" "final")
  (variable_declarator name: (identifier) @name (#match? @name "^[A-Z][A-Z0-9_]*$"))) @definition.constant
(field_declaration
  (modifiers "final" "static")
  (variable_declarator name: (identifier) @name (#match? @name "^[A-Z][A-Z0-9_]*$"))) @definition.constant
(constant_declaration
  (variable_declarator name: (identifier) @name (#match? @name "^[A-Z][A-Z0-9_]*$"))) @definition.constant
