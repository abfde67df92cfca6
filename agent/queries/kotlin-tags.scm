; Kotlin definitions: classes, interfaces, enum classes, objects (as classes), functions (methods when
; inside a class, interface or object), `const val` constants and type aliases.
((class_declaration "class" (type_identifier) @name) @definition.class
  (#not-match? @definition.class "^(\\s*(@[\\w.:]+(\\(([^()]|\\([^()]*\\))*\\))?|[a-z]+)\\s)*\\s*enum\\s+class\\b"))
((class_declaration "enum" (type_identifier) @name) @definition.enum
  (#match? @definition.enum "^(\\s*(@[\\w.:]+(\\(([^()]|\\([^()]*\\))*\\))?|[a-z]+)\\s)*\\s*enum\\s+class\\b"))
(class_declaration "interface" (type_identifier) @name) @definition.interface
(object_declaration (type_identifier) @name) @definition.class
(companion_object (type_identifier) @name) @definition.class

(function_declaration (simple_identifier) @name) @definition.function

(property_declaration
  (modifiers (property_modifier) @_const (#eq? @_const "const"))
  (variable_declaration (simple_identifier) @name)) @definition.constant

(type_alias (type_identifier) @name) @definition.type
